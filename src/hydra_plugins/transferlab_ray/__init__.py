"""`hydra/launcher=ray`: each job of a multirun as a Ray task (conf/hydra/launcher/ray.yaml documents the keys).

Hydra imports every module of the `hydra_plugins` namespace package at each start, so nothing here imports Ray:
ray_launcher.py is the plugin, ray_jobs.py (imported when a sweep launches) talks to the cluster.
"""
