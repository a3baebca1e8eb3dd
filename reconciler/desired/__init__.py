"""Stage 2, the desired state: place the validated fleet on GPUs and compile it to the Serve config
apply will PUT. Pure but for reading model sizes; reads fleetfiles only."""
