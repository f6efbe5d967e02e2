"""Triton kernels, installed as the package cnnops.kernels. Imports nothing from cnnops."""
