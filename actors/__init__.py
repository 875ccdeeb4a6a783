"""ray_eplb.actors."""
