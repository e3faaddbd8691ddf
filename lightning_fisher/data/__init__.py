"""Files: folders of sample files (``tensor_folder``), atomic writes (``atomic_io``), and the
natural sort order used for module and file names (``natural_sort``)."""
