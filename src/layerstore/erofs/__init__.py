"""EROFS images in the composefs layout: a format package (it knows nothing of the store).

:mod:`.tree` is the input (typed inodes), :mod:`.writer` writes it, :mod:`.format` holds the
on-disk records.
"""
