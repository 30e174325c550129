"""Feature analysis over an activation cache: feature store, hierarchy, splitting, absorption, matching, the
taxonomy benchmark and the gallery."""
