"""raymta benchmarks: throughput, a Postfix peer, the SMTP physical limit, and Ray scaling.

Everything here runs on loopback only (DNS, SMTP receivers, Postfix, Ray) and stops what it
starts. See ``bench/README.md``.
"""
