"""The paper's applications of external memory management (section 8), as libraries.

Each module here is a library a task imports, built only on the user library
(`pymach.mach`, `pymach.mach_vm`) and the data managers of `pymach.pagers`; each works in
embedded and native mode. They sit beside `libmach/` and `machd/` in the layers and import
neither.
"""
