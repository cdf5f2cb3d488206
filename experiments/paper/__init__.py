"""Paper-scale stage configs (Table 3 of the paper); each names its TPU topology for AOT plans."""
