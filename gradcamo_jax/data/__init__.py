"""Data layer: file formats (`formats`), synthetic plates (`synthetic`), single-cell crops (`crop`).

Only `formats` touches files; the others compute and call it.
"""
