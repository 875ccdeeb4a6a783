"""ray_eplb.controller.cli: the ray-eplb command and its subcommands."""
