"""Locust load generation for DPUmesh bench: the locustfile, its users and shapes.

`locustfile.py` (users, Locust event wiring) and `step_shape.py` (opt-in
step load) are Locust files; `options`, `schedule`, `recorder`, `seedjson`
hold the logic and import nothing from Locust, `nodelay` only geventhttpclient.
"""
