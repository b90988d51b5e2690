"""Brain data loaders and geometry.

- :mod:`.nsd`: NSD fsaverage betas -> per-image z-scored, repeat-averaged responses.
- :mod:`.atlas`: HCP-MMP1 labels, ROI centroids and distance from V1 (Euclidean, geodesic).
- :mod:`.align`: match brain rows and feature rows to the stimulus table by ``image_id``.
- :mod:`.meg`: THINGS-MEG loaders (see ``docs/meg.md``).
"""
