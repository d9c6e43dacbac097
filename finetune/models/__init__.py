"""Models: the timm factory with pretrained weights from the hub, a file or offline packages,
and builder references for models that are not in timm.
"""

from finetune.models.factory import *  # noqa: F401,F403
from finetune.models.factory import load_model, resolve_data_config  # noqa: F401
