"""What users and deployments meet: the admin change page, DRF support, and installing a
trigger migration's SQL without queueing the application. Django's fixed places
(``counts/admin.py``, ``apps.py``, ``models.py``, ``management/``) sit one level up."""
