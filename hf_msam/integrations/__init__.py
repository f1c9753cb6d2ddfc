"""Adapters to upstream libraries: each reads or changes what an upstream release may change, in one file, with the
versions it was tested on, so that an upstream change lands here and nowhere else.

- `hf_msam.integrations.hub_kernels`: transformers' hub kernels (the `kernels` package), which replace layers'
  forwards when a model loaded with `from_pretrained` changes between training and evaluation.
- `hf_msam.integrations.patching`: putting a callable on an instance for a while and taking it off again, exactly,
  whoever else changed the attribute in between.
"""
