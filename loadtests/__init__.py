"""Locust load generation for DPUmesh bench: the locustfile, its users and shapes.

`locustfile.py` (users, Locust event wiring) and `step_shape.py` (opt-in
step load) are Locust files; `webui` puts the Mesh tab into Locust's web UI.
`options`, `schedule`, `recorder`, `seedjson`, `meshstats` (the Mesh tab's
numbers) and `counters` (a stack's counters: deltas, checked readings) hold
the logic and import nothing from Locust, `nodelay` only geventhttpclient.
"""
