"""The model stage: finding and loading the base model (GGUF conversion, the tiny test model,
a cached Hugging Face id, the ``meta`` device for budgets; :mod:`.load`), putting a method
into it (:mod:`.base`), the frozen lower-layer cache (:mod:`.lower_cache`), tokenising
prompt/answer pairs (:mod:`.tokens`), run folders and rebuilding a run's model from one
(:mod:`.run_folder`), and the lm-eval model class ``moe-lora`` (:mod:`.lm_eval_model`)."""
