"""The Kubeflow Pipelines client side of the library: what a KFP backend release reads of a
compiled package (`kfp_versions`), a run's parameters checked as its pods will use them
(`arguments`, `package`), the KFP API through `kfp.Client` (`kfp_api`), where and as whom the
pods run (`cluster`), cron for recurring runs (`cron`), submit / schedule / resume (`submit`)
and the cluster checks before a run (`preflight`).

The pipeline itself (its graph, compile, kfp.local) lives in the repository's ``pipelines/``;
``python -m pipelines`` and ``carclassifier preflight`` are the command lines over this.
"""
