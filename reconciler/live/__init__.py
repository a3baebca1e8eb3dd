"""Stage 2', the live state: what Ray Serve runs now (its REST API), health in one vocabulary, an
engine's log, and the local Ray head `fleetctl up` starts. Beside desired/, never importing it."""
