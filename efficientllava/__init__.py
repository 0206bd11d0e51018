"""efficientllava: automatic, generalization-aware pruning of LLaVA-style vision-language models."""
from omegaconf import OmegaConf

__version__ = "0.1.0"


def _asset(name: str) -> str:
    from efficientllava.models import ASSETS

    return str(ASSETS / name)


# `${efficientllava.asset:toy_llava}` in configs points inside the installed package.
if not OmegaConf.has_resolver("efficientllava.asset"):
    OmegaConf.register_new_resolver("efficientllava.asset", _asset)
