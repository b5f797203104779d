"""kvmsim.explore"""
