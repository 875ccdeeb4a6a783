"""Names the workers and the controller share: their Ray namespace, the named actors, the custom
rank resource. One module, imported by both :mod:`ray_eplb.actors` and :mod:`ray_eplb.controller`
(the actors never import the controller). No Ray import."""

#: Ray namespace of every named actor the balancer creates.
NAMESPACE = "ray_eplb"
#: Name of the worker actor of rank ``r``: ``WORKER_NAME.format(rank=r)``.
WORKER_NAME = "ray_eplb_worker_{rank}"
#: Name of the controller actor.
CONTROLLER_NAME = "ray_eplb_controller"
#: Custom resource a node declares per rank when it has no GPUs (the demo's stand-in for GPUs).
RANK_RESOURCE = "eplb_rank"
