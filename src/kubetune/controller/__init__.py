"""The kopf operator: a FineTuneJob becomes a ConfigMap, a headless Service and an Indexed Job
per run, and its status is computed level-triggered from those children.

`children` and `status` are pure functions (tested without a cluster); `handlers` is the thin
kopf layer that reads the children, writes what is missing and patches the status.
"""
