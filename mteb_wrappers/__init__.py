"""mteb model implementations for colintern's retrievers (one file per model family, as in mteb itself)."""

from mteb_wrappers.colintern3_5_models import ColIntern3_5Wrapper, colintern3_5_1b

__all__ = ["ColIntern3_5Wrapper", "colintern3_5_1b"]
