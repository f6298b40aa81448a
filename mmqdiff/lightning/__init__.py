"""Lightning wiring of the pure-torch cores. Importing it keeps Lightning's promotional tips ("💡 Tip: ...
litlogger / litmodels") out of the output."""
import logging


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())
