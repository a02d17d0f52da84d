from .cli import main_process

if __name__ == "__main__":
    main_process()
