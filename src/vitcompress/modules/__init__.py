"""The new layers: static attention (DGSSA) and token aggregation (GLAD)."""

from vitcompress.modules.dgssa import DGSSA
from vitcompress.modules.glad import GLAD

__all__ = ["DGSSA", "GLAD"]
