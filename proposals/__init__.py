"""Region proposals: Selective Search, MultiBox, and the GoogLeNet recipe that merges them."""
