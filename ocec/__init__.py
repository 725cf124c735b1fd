"""ocec: train and fine-tune tiny open/closed-eye classifiers.

From Python: `ocec.train(**flags)`, `ocec.evaluate(checkpoint, data_root)`, `ocec.predict(checkpoint,
images=...)`, `ocec.export(checkpoint, output)`; mistakes raise `ocec.UserError`. The layers below
(core, data, models, engine, finetune, training, tools) are described in each subpackage's docstring.
"""

from .api import evaluate, export, predict, train
from .core.errors import UserError
from .core.version import __version__

__all__ = ["train", "evaluate", "predict", "export", "UserError", "__version__"]
