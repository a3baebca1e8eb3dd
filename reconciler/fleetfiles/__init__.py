"""Stage 1, the fleet files: read fleet.yaml + fleet.d/*.yaml, check them against the spec, and the
facts they need (units, GPU inventory, model size estimates, swap groups). Imports no other stage."""
