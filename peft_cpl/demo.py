"""The README's demo: knowledge injection with CPL on SmolLM2-135M-Instruct (filled in by the selection issue)."""


def main() -> None:
    print("peft-cpl demo: not yet — collaborative selection lands with the selection issue.")


if __name__ == "__main__":
    main()
