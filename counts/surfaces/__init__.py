"""What users and deployments meet: the admin change page, DRF support, migration operations
and the migrations writer. Django's fixed places (``counts/admin.py``, ``apps.py``,
``models.py``, ``management/commands/``) sit beside this package at the same level."""
