"""pacs-ai-node: the DICOM service around the screening pipelines (network, disk, process lifecycle)."""

#: The one place the version is written: setup.cfg reads it (``attr:``), ``pacs-ai-node --version``
#: prints it, and the node sends it in its Implementation Version Name and result objects.
__version__ = "0.1.0"
