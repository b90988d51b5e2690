"""Simulators that write miniature datasets in the real on-disk layouts, with planted effects.

- :mod:`.effects`: generic planted-effect pieces (layer read-outs, layer-depth tuning,
  noise) shared by the NSD and MEG simulators.
- :mod:`.nsd`: a miniature Natural Scenes Dataset (fsaverage5 betas, HCP-MMP1 labels, surfaces).
- :mod:`.meg`: a miniature THINGS-MEG (see ``docs/meg.md``).
"""
