"""fastlstm: drop-in ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` with every classic variant."""

from .interop import convert_lstms
from .masks import DirectionMasks, LSTMMasks
from .modules import LSTM, LSTMCell
from .options import LSTMOptions
from .streaming import LSTMState, StreamingLSTM

__version__ = "0.1.0"

__all__ = ["LSTM", "LSTMCell", "LSTMOptions", "LSTMMasks", "DirectionMasks", "LSTMState", "StreamingLSTM", "convert_lstms", "__version__"]
