"""The shared core: what the web layer (``app``) and the workers (``worker``) both stand on.

Settings, the database models and unit of work, blob storage, the queue port, webhook sending
and data retention. It imports the job contract (``likeness.contract``) and nothing above it.
"""
