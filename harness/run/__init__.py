"""The run stage: jobs that compute. Training one run or component (:mod:`.train`), scoring
it with lm-eval (:mod:`.evaluate`), rebuilding a finished run's weights (:mod:`.restore`),
a staged method's last stage over existing components (:mod:`.compose`), and the check
that the harness scores like lm-eval's own ``hf`` model (:mod:`.identity`)."""
