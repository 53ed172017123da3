"""The edgeseek command."""
import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def version():
    print("edgeseek")
