"""Routing of program requests across replicas: the policy (`affinity.py`, no Ray) and, next, its Ray
Serve `RequestRouter` adapter."""
