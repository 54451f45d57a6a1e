import os

import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "ci" if os.getenv("CI") else "dev"))
torch.set_num_threads(min(2, torch.get_num_threads()))
