"""ray_eplb.controller.cli: the ``ray-eplb`` command and the live demo (with its comparison mode,
the dashboard inspection and the headless-browser check). Tools around the control plane, not part
of it: nothing in :mod:`ray_eplb.controller` imports this package."""
