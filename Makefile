.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format bench docs

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## Install the package in editable mode with all extras
	pip install -e ".[test,lint,docs,bench]"

test: ## Run the fast tests
	pytest -q backpack_tn tests

test-all: ## Run all tests, including those marked slow
	pytest -q -m "" backpack_tn tests

lint: ## Check formatting and lint
	ruff format --check . && ruff check .

format: ## Format and fix lint
	ruff format . && ruff check --fix .

bench: ## Run the quick benchmark
	python -m backpack_tn bench --quick

docs: ## Build the documentation
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict
