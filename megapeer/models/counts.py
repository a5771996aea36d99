def param_counts(*a): pass
def flops_per_token(*a): pass
