"""Decoding a PURE answer: the loop and its parts.

* :mod:`pure.decoding.loop`: :class:`~pure.decoding.loop.RestorationDecoder`, the phases top to bottom;
* :mod:`pure.decoding.jacobi`: speculative Jacobi decoding, a variant the loop calls for the image phase;
* :mod:`pure.decoding.config`: the user's settings (:class:`~pure.decoding.config.SamplingConfig`) and
  forced text;
* :mod:`pure.decoding.sampling`: the sampler: grid constraint, entropy top-k, guidance, counter-based noise;
* :mod:`pure.decoding.layout`: where each row and its guidance twin live in the KV cache, and every mask;
* :mod:`pure.decoding.attention`: the attention a decode runs, reading the live cache only;
* :mod:`pure.decoding.capture`: CUDA graphs and compiling;
* :mod:`pure.decoding.traffic`: the bytes a step reads.

Nothing is imported here, so that :mod:`pure.model` can use the attention without loading the loop.
"""
