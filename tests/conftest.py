import os

import torch
from hypothesis import settings

# dev: quick local runs. ci: a larger budget (the suite's categorical spaces, e.g. norm x
# direction x dtype x mask kind, have hundreds of combinations). Tests whose space is large
# raise their own budget with @settings(max_examples=...), scaled from the profile's.
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True)
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "ci" if os.getenv("CI") else "dev"))
torch.set_num_threads(min(2, torch.get_num_threads()))
