"""A method plugin that is an ablation: SMoRA with the paper's per-step bias rate.

SMoRA (arXiv 2501.15103) balances its rank experts with a selection bias moved by
``gamma = 1e-5`` per step. The built-in ``smora`` scales ``gamma`` to the run's length
(methods/smora.py: the paper's total drift per run); this plugin keeps ``1e-5`` at any
length, the form the paper states and the harness used before. Run beside ``smora`` it
shows what the rule changes: the main table's effective-experts column and, because it
declares ``ablation_of``, a row "ablation vs smora" per granularity in the significance
table. Only the finest granularity runs (``variants``), where collapse is most likely.

Nothing here reimplements SMoRA: a subclass changes one option and one hook.
"""

from harness.adapters import register
from methods.smora import PAPER_RATE, SMoRA


@register
class SMoRAPaperRate(SMoRA):
    name = "smora_paper"
    display_name = "SMoRA (paper rate)"
    description = "SMoRA with the paper's bias rate 1e-5 per step at any run length (ablation)"
    ablation_of = "smora"

    def prepare_options(self, options, context):
        opts = dict(options or {})
        if opts.get("bias_update_rate") is None:
            opts["bias_update_rate"] = PAPER_RATE
        return opts

    def variants(self, request, options=None):
        return [max(super().variants(request, options), key=lambda v: v.granularity)]
