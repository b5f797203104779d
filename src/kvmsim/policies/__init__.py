"""kvmsim.policies"""
