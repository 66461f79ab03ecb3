"""Pure functions: the math of each layer, forward and backward, apart from parameters."""
