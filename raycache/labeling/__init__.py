"""Teacher labeling of candidate pairs: which prompt pairs can share one response, as P(yes).

* ``prompt``: the one judging prompt of every LLM teacher, and yes/no log-probs -> P(yes);
* ``base``: the teacher interface, the verdict type and the label columns;
* ``backends``: the ``reference``, ``hf`` and ``openai`` teachers (and the registry);
* ``vllm_backend``: the ``vllm`` teacher on Ray Data's LLM processors (GPU clusters);
* ``job``: ``run(cfg: LabelConfig) -> summary``, the resumable Ray Data labeling job.

Modules import Ray, torch and transformers lazily; import the one you need.
"""
