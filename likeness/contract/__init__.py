"""The job contract shared by the API, the workers, the CLI and clients (torch-free).

* :mod:`likeness.contract.plan`: job kinds, states, phases, stages, queues, progress shares and
  the allowed state changes (:func:`~likeness.contract.plan.transition`);
* :mod:`likeness.contract.requests`: one request model per kind, checked and resolved once.
"""
