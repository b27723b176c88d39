"""The service on Ray Serve: many replicas behind one HTTP ingress, each request routed to a replica that
already holds its adapter (Serve's model multiplexing), admin changes to the shared store broadcast to every
replica. Needs the `ray` extra (`pip install 'adapter-serving[ray]'`); start it with
`serve run deploy/ray/config.yaml` or `make serve-ray`. `app.build` is the application builder the config file
names; `ingress.py`, `replica.py` and `forward.py` hold the two deployments and the request they pass.
"""
