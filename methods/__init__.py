"""The built-in method plugins: one module per method, each importing only the adapter
toolkit (:mod:`harness.adapters`), never the engine.

``METHODS`` is the registry's lazy table: a name is imported only when a study, a
command or a test asks for it. A *built-in* method is one line here (its name ->
``"module:Class"``). A *plugin* needs no edit here: it registers itself
(``@harness.adapters.register``) and is found by its import path in a study config
(``plugins:``) or by an entry point in the ``harness.methods`` group.
"""

METHODS = {
    "lora": "methods.lora:LoRA",
    "multilora": "methods.multilora:MultiLoRA",
    "molora": "methods.molora:MoLoRA",
    "sira": "methods.sira:SiRA",
    "smora": "methods.smora:SMoRA",
    "malora": "methods.malora:MALoRA",
    "moa": "methods.moa:MoA",
    "hydralora": "methods.hydralora:HydraLoRA",
    "loramoe": "methods.loramoe:LoRAMoE",
    "mode": "methods.mode:MoDE",
    "mola": "methods.mola:MoLA",
    "gralora": "methods.gralora:GraLoRA",
    "flylora": "methods.flylora:FlyLoRA",
    "goat_moe": "methods.goat:GOAT",
    "xlora": "methods.xlora:XLoRA",
    "arrow_lora": "methods.arrow:Arrow",
}
