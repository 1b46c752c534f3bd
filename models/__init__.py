"""Policies as stateless functions over a params dict (see DESIGN.md): GR00T N1.5 and a small MLP actor-critic."""
