"""ray_eplb.controller."""
